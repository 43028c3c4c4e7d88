"""The embedded tiny model: synthetic world, judge, training and evaluation.

- ``world.py``: the fixed vocabulary (3 backgrounds, 6 colours, 3 shapes, 2 sizes, 9 positions), scene specs,
  anti-aliased rendering, deterministic from a seed. numpy + PIL only.
- ``captions.py``: natural caption templates with style-tag noise (some past 77 tokens) and the inverse parser.
- ``judge.py``: background and each object's colour, shape, size and cell from pixels; validated (``validate``).
- ``eval.py`` (command: ``commands/eval.py``): ``clipdiffusion eval``, GenEval-style adherence on a fixed held-out prompt set,
  long-prompt and clip-skip studies, tiny-CLIP score; ground-truth and noise stand-ins bound every table.
- ``models.py`` / ``settings.py`` / ``batches.py`` / ``train.py`` (command: ``commands/train_tiny.py``): ``clipdiffusion train-tiny``, the model sizes and the phased,
  resumable training (tiny CLIP, VAE, latent pool, UNet) that writes ``tiny-sd.safetensors``.
- ``data/``: the shipped weights, loaded by ``Pipeline.default()``.
"""
