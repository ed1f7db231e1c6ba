"""export: AIM checkpoints to ONNX / TensorRT artefacts with proven parity and a manifest (`python -m export`).

Public entry points (import the submodule; this package imports nothing at load time, so `export.runtime` stays
importable where only onnxruntime is installed):
    export.onnx.export_onnx(source_or_model, out_dir, *, max_batch=32, precision="fp32", opset=None, outputs=None,
                            check_parity=True) -> ExportManifest
    export.validate.validate_directory(dir, *, checkpoint=None) -> list[ValidationResult]
    export.runtime.create_session(model_path, *, providers=None, intra_op_threads=None, ...) -> InferenceSession
    export.tensorrt.build_engine(onnx_path, out_dir, *, precision="fp16", ...) -> ExportManifest
"""
