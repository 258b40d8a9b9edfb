"""The README stays true: its first commands, every setting, every job field, the paths it names."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_first_two_commands() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "README has no bash block"
    assert README.index(block.group(0)) < README.index("\n## ", README.index("## The two commands") + 1)
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/quickstart.sh", "python3 -m pytest"]
    assert (ROOT / "scripts" / "quickstart.sh").is_file()


def test_every_setting_is_documented_with_its_variable() -> None:
    from evosparse.jobs.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "EVOSPARSE_")
    missing = [f"{prefix}{name.upper()}" for name in Settings.model_fields
               if f"`{prefix}{name.upper()}`" not in README]
    assert not missing, f"README's configuration table lacks {missing}"


def test_every_job_field_is_documented() -> None:
    from evosparse.jobs.spec import JobSpec, QuantizeSettings, SearchSettings

    names = [n for n in JobSpec.model_fields if n != "search"]
    names += [f"search.{n}" for n in SearchSettings.model_fields]
    names += [f"quantize.{n}" for n in QuantizeSettings.model_fields]
    missing = [n for n in names if f"`{n}`" not in README]
    assert not missing, f"README's job field table lacks {missing}"


def test_paths_in_the_layout_exist() -> None:
    section = README[README.index("## Repository layout"):]
    paths = re.findall(r"^\| `([^`]+)`", section, re.M)
    assert len(paths) >= 8
    for p in paths:
        assert (ROOT / p.rstrip("/")).exists(), f"README names {p}, which does not exist"
