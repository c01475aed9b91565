"""`pip install neuqi` without extras is a working quantizer; extras are named when missing."""

import subprocess
import sys
import tomllib
from pathlib import Path

from .conftest import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
EXTRA_MODULES = ("lm_eval", "matplotlib", "compressed_tensors", "hqq", "mwparserfromhell", "rdata")

# Runs a script with the extras' modules not found on sys.path, as in an install without them.
BLOCK = f"""
import sys
import importlib.machinery as machinery
class Hidden(machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA_MODULES!r}:
            return None
        return machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [Hidden if f is machinery.PathFinder else f for f in sys.meta_path]
"""


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + script], capture_output=True, text=True,
                          timeout=600, env={"NEUQI_COMPILE": "0", "PATH": "/usr/bin:/bin"})


def test_quantize_and_load_work_without_the_extras(calib_file, tmp_path):
    model = make_tiny_model(tmp_path / "tiny", "llama")
    out = tmp_path / "runs"
    res = _run(f"""
from neuqi.cli import app
import neuqi
try:
    app(["quantize", {str(model)!r}, "--bits", "3", "--group-size", "32", "--calib", {str(calib_file)!r},
         "--nsamples", "2", "--seqlen", "32", "--out-dir", {str(out)!r}, "--device", "cpu", "-q"])
except SystemExit as e:
    assert e.code in (0, None), e.code
run = next(p for p in __import__("pathlib").Path({str(out)!r}).iterdir())
neuqi.load(run)
print("LOADED", sorted(m for m in {EXTRA_MODULES!r} if m in sys.modules))
""")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED []" in res.stdout


def test_a_missing_extra_names_its_install_command(tmp_path):
    res = _run("""
from neuqi.report import plot_loss_curve
try:
    plot_loss_curve([{"step": 1, "loss": 1.0}], __import__("pathlib").Path("x.png"), "t")
except RuntimeError as e:
    print("ERR", e)
""")
    assert "pip install 'neuqi[report]'" in res.stdout, res.stderr[-2000:]


def test_every_declared_dependency_is_imported_somewhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    import_names = {"lm-eval": "lm_eval", "compressed-tensors": "compressed_tensors"}
    sources = "\n".join(p.read_text() for p in (ROOT / "src").rglob("*.py"))
    declared = list(project["dependencies"])
    for extra, deps in project["optional-dependencies"].items():
        if extra not in ("test", "bench"):
            declared += deps
    for dep in declared:
        name = dep.split(">")[0].split("<")[0].split("=")[0].strip()
        module = import_names.get(name, name)
        assert f"import {module}" in sources or f"from {module}" in sources or f'"{module}' in sources, name
