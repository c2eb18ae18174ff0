"""Training / evaluation data: the synthetic shapes world (:mod:`cheers_deploy.data.shapes`). numpy + cv2 only."""

from .shapes import (  # noqa: F401
    COLORS, DEFAULT_RESOLUTION, HELDOUT_COMBOS, POSITIONS, SHAPES, SIZES, SPLITS, ObjectSpec, Sample,
    Scene, ShapeObject, caption, make_split, parse_prompt, qa_pairs, render, scene_key, scene_split,
    t2i_prompts, vocabulary,
)
