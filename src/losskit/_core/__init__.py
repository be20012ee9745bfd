"""The bottom layer every other layer of losskit shares: the one reduction path, input
validation and the checks mode, dtype rules, numerical building blocks and the shared
docstring text. It imports nothing else of losskit, so data only flows down from here."""
