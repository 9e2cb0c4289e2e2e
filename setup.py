from setuptools import find_packages, setup

setup(
    name="jaxedit",
    version="0.1.0",
    description="ROME, MEMIT and EMMET fact editing for Llama-3-family models in JAX/Flax",
    # experiments/, benchmarks/ and baselines/ run from a checkout (python -m experiments.demo); only
    # the two libraries are installed.
    packages=find_packages(include=["jaxedit", "jaxedit.*", "llama3_flax", "llama3_flax.*"]),
    python_requires=">=3.10",
    entry_points={"console_scripts": ["jaxedit=jaxedit.cli:main"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.12.6,<0.14",
        "optax>=0.2.4",
        "transformers>=4.45",
        "datasets",
        "numpy",
        "absl-py",
        "safetensors",
        "gguf>=0.10",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "huggingface_hub",
    ],
    extras_require={
        # torch==2.13.0 is the CPU build on local disk; other specs pull gigabytes of CUDA wheels.
        # accelerate: transformers needs it to load GGUF files (our reference in parity tests).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "accelerate", "nbclient", "nbformat", "ipykernel"],
    },
)
