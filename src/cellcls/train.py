"""``python -m cellcls.train [overrides]``: train one model from the Hydra config in ``configs/``
(:mod:`cellcls.commands.train`).

``cellcls.train(overrides)`` is the Python API (:func:`cellcls.api.train`); nothing imports this module, whose name
would shadow that function once imported.
"""

if __name__ == "__main__":
    from cellcls.commands.train import main

    main()
