"""Stage 7, serving: the SavedModel signatures, writing it (export), its clients, predict over a Kaggle
folder, and a stand-in for TF Serving."""
