"""Evaluation: the OpenCV shapes detector and GenEval-style generation scoring. numpy + cv2 only."""

from .detector import Detection, detect, score_generation  # noqa: F401
