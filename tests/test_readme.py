"""The README's Quickstart runs as written."""

import re
import shutil
from pathlib import Path


def test_readme_quickstart_runs(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, flags=re.S)
    assert blocks, "README's Quickstart has no python block"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_readme_data_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Data", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["batch"].chosen.ids_BxL.shape == (8, 64) and scope["state"].step == 1


def test_readme_training_example_runs(tmp_path, monkeypatch):
    root = Path(__file__).parents[1]
    section = (root / "README.md").read_text().split("## Training", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    shutil.copytree(root / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)  # runs/quickstart lands in the temporary directory
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "runs" / "quickstart" / "model" / "model.safetensors").is_file()
    assert scope["metrics"]["loss"] < 3.0
