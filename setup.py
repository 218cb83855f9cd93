from setuptools import find_packages, setup

setup(
    name="memit_fast",
    version="0.1.0",
    packages=find_packages(include=["memit_fast", "memit_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "transformers>=4.56", "safetensors", "tqdm", "numpy"],
    entry_points={"console_scripts": ["memit-fast=memit_fast.cli:main"]},
)
