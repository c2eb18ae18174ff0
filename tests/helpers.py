"""Helpers shared by several test modules (not tests themselves; tests/ is on sys.path, so `from helpers import
...`). Importing this module needs neither torch nor onnx: those are imported where a helper uses them."""
from pathlib import Path

from cheers_deploy.config import CheersConfig


def tiny_test_config() -> CheersConfig:
    """32 px, one LLM token per image: the official couplings at the smallest legal sizes."""
    return CheersConfig.from_dict({
        "vae_encoder_config": {"resolution": 32, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                               "z_channels": 8},
        "vae_decoder_config": {"resolution": 32, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 0,
                               "z_channels": 8},
        "vision_representation_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        "text_config": {"vocab_size": 448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "gen_head_depth": 1, "hi_head_depth": 1})


def export_tiny(ckpt: Path, base: Path) -> Path:
    """The session's export of the tiny checkpoint (idempotent: later calls only re-read the manifest)."""
    from cheers_deploy.export import exporter

    out = base / "tiny-workdir"
    exporter.export_all(ckpt, out, progress=False)
    return out
