"""Optional bridges to the libraries people train with.

Nothing here is imported by ``import losskit``: each bridge is imported by name (for
example ``from losskit.integrations import transformers``) and needs its extra
(``pip install 'losskit[transformers]'``).
"""
