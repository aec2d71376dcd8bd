"""Data: grounding records and manifests, data set adapters, synthetic phantoms, pipelines."""
