"""ONNX export of the five Cheers stages (needs torch): graph specs, the exporter, torch-vs-ORT comparisons.

    from cheers_deploy.export.exporter import export_all
    export_all(checkpoint_dir, "work/tiny")          # -> work/tiny/{*.onnx, manifest.json, ...}
"""
