"""The build step that ships the presets: configs/*.yaml (the source, at the repository's root, where
the tests, the Makefile and the docs name them) are copied into the wheel as steplm/configs/, where
``steplm.config.presets`` finds them after `pip install`. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithPresets(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "steplm" / "configs"
        dest.mkdir(parents=True, exist_ok=True)
        for preset in sorted((ROOT / "configs").glob("*.yaml")):
            shutil.copyfile(preset, dest / preset.name)


setup(cmdclass={"build_py": BuildWithPresets})
