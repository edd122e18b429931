"""Installable layout: the root ``dm_*`` modules and the ``ddsm_train`` scripts."""
from setuptools import setup

setup(
    name="end2end-all-conv",
    version="0.1.0",
    description=(
        "All-convolutional whole-mammogram classifier trained end to end from a patch "
        "classifier (Shen et al., Sci Rep 2019), on TensorFlow 2 / tf-keras."
    ),
    python_requires=">=3.10",
    py_modules=["dm_image", "dm_keras_ext", "dm_resnet", "dm_multi_gpu", "dm_enet"],
    packages=["ddsm_train"],
    install_requires=[
        line.strip()
        for line in open("requirements.txt")
        if line.strip() and not line.startswith("#") and not line.startswith(("pytest", "ruff"))
    ],
)
