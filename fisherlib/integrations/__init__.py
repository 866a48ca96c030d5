"""The Fisher as an artifact other tools consume.

Each module here imports the library it serves only when it is used (an extra each), so that
``import fisherlib`` stays free of them:

- :mod:`fisherlib.integrations.safetensors`: a :class:`~fisherlib.FisherEstimate` as a
  ``.safetensors`` file whose tensors are named as in the model's ``state_dict`` (value and
  standard error) with the estimate's provenance in the header; read back with or without
  fisherlib (``pip install safetensors``). ``FisherEstimate.save`` / ``load`` pick this format
  for a path ending in ``.safetensors``.
- :mod:`fisherlib.integrations.laplace`: a laplace-torch curvature backend
  (``pip install laplace-torch``).
- :mod:`fisherlib.integrations.huggingface`: a ``transformers`` ``TrainerCallback`` that keeps a
  Fisher during ``Trainer.train`` and writes it at the end.

Fisher merging lives with the other uses of the Fisher, in :mod:`fisherlib.uses.merging`.
"""

__all__: list[str] = []
