"""Command implementations whose ``python -m`` module name the Python API also uses: ``cellcls.train`` is the API's
function (:func:`cellcls.api.train`), so the training command lives here and ``cellcls/train.py`` only runs it."""
