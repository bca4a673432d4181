"""Batch jobs composed from the curator library (installed as ``curator.pipelines``).

Each job is cut into stages that do not know which engine runs them: a reader (files to
preprocessed tensors), a mapper (tensors to embeddings and probabilities) and a writer (rows to
workspace parts).
"""
