"""The base install runs without PyTorch: the torch-free modules import with torch blocked, and the torch-only
parts fail with MissingDependencyError naming the extra to install."""
import subprocess
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BLOCK = "import sys; sys.modules['torch'] = None\n"        # any `import torch` now raises ImportError


def run_blocked(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc


def test_torch_free_modules_import():
    proc = run_blocked("""
        import cheers_deploy, cheers_deploy.processor, cheers_deploy.tokenizer, cheers_deploy.config
        import cheers_deploy.runtime.pipeline, cheers_deploy.runtime.sampling, cheers_deploy.runtime.masks
        import cheers_deploy.checkpoint, cheers_deploy.errors
        from cheers_deploy import Pipeline
        assert sys.modules['torch'] is None
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_model_import_needs_torch_extra():
    proc = run_blocked("""
        from cheers_deploy.errors import MissingDependencyError
        try:
            from cheers_deploy.model import CheersModel
        except MissingDependencyError as exc:
            print("MDE:", exc)
        else:
            raise SystemExit("imported without torch")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MDE:") and "cheers-deploy[torch]" in proc.stdout


def test_pipeline_from_checkpoint_needs_torch_extra(reference_dir):
    proc = run_blocked(f"""
        from cheers_deploy.errors import MissingDependencyError
        from cheers_deploy.runtime.pipeline import Pipeline
        try:
            Pipeline.from_pretrained({str(reference_dir)!r})
        except MissingDependencyError as exc:
            print("MDE:", exc)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MDE:") and "cheers-deploy[torch]" in proc.stdout


def test_torch_free_parts_work_without_torch(reference_dir):
    """Tokenizer, processor, config, sampler and masks run (not just import) without torch."""
    proc = run_blocked(f"""
        import numpy as np
        from cheers_deploy.config import CheersConfig
        from cheers_deploy.processor import Processor
        from cheers_deploy.runtime.masks import prefill_mask
        from cheers_deploy.runtime.sampling import schedule, sample_token
        proc = Processor.from_dir({str(reference_dir)!r})
        ids = proc.t2i_ids("A green triangle next to a blue square.")
        assert ids[-1] == 151667, ids[-1]
        assert proc.pixel_values(np.zeros((30, 40, 3), np.uint8)).shape == (3, 128, 128)
        assert CheersConfig.from_file({str(reference_dir / "config.json")!r}).text_config.hidden_size == 64
        assert schedule(8, 0.6)[-1] == 1.0 and prefill_mask(np.zeros(4, bool)).sum() == 10
        assert sample_token(np.array([0.0, 2.0]), 0.0, 1.0, np.random.default_rng(0)) == 1
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_bundled_graphs_generate_and_answer_without_torch():
    """The shipped graphs of the bundled model (what `pip install cheers-deploy` runs by default) on onnxruntime:
    generate with the model's defaults, the detector scores it, a colour question is answered; torch stays blocked."""
    proc = run_blocked("""
        from cheers_deploy.eval.detector import score_generation
        from cheers_deploy.hub import bundled_workdir
        from cheers_deploy.runtime.pipeline import Pipeline
        wd = bundled_workdir()
        assert wd is not None, "the package ships no bundled graphs (python tools/make_bundled_graphs.py)"
        pipe = Pipeline.from_workdir(wd, backend="ort", threads=2)
        res = pipe.generate("a red circle on the left")
        score = score_generation(res.image, "a red circle on the left")
        assert score["overall"], score
        ans = pipe.answer(res.image, "what color is the circle?")
        assert ans.text.strip().lower() == "red", ans.text
        assert sys.modules['torch'] is None
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_cli_runs_bundled_model_without_torch(tmp_path):
    """`cheers-deploy generate` / `ask` with no --checkpoint / --workdir: the bundled graphs, no export, no torch."""
    out = tmp_path / "x.png"
    proc = run_blocked(f"""
        from cheers_deploy.cli.main import main
        rc = main(["generate", "--prompt", "a red circle on the left", "--out", {str(out)!r}])
        assert rc == 0, rc
        rc = main(["ask", "--image", {str(out)!r}, "--question", "what color is the circle?"])
        assert rc == 0, rc
        assert sys.modules['torch'] is None
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    assert out.is_file()
    assert "red" in [line.strip().lower() for line in proc.stdout.splitlines()], proc.stdout   # the answer line
