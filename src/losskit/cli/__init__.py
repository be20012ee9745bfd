"""The `losskit` command. Imports its heavier tools (matplotlib, tqdm, scikit-learn) lazily."""
