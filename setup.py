from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
core = [line.split("#")[0].strip() for line in (here / "requirements.txt").read_text().splitlines()]
core = [line for line in core if line]

setup(
    name="eagle-gto",
    version="0.1.0",
    description="Lossless speculative decoding with EAGLE-1/2, EAGLE-3 and GTO draft heads",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["eagle_gto", "eagle_gto.*", "application", "application.*"]),
    package_data={"eagle_gto.demo": ["assets/*", "assets/*/*"]},
    python_requires=">=3.10",
    install_requires=core,
    extras_require={
        "webui": ["gradio>=6,<7", "markdown-it-py>=3"],  # markdown-it: where the chat shows code
        "api": ["fastapi>=0.110", "uvicorn>=0.29"],
        "train": ["matplotlib>=3.7"],
        "eval": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "scipy>=1.10", "openai>=1.30", "playwright>=1.40", "httpx>=0.27"],
    },
)
