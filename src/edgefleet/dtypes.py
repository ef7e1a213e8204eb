"""The tensor element types edgefleet serves, by each naming scheme: ONNX's, onnxruntime's and OIP's.

Plain tables with no imports: the lean inference worker reads them without loading the runtime layer, and every
layer (runtime, agent, simulator) reads the same ones.
"""

from __future__ import annotations

__all__ = ["DTYPE_TO_OIP", "OIP_TO_DTYPE", "ONNX_TO_NUMPY", "ORT_TO_NUMPY"]

# ONNX element type -> numpy dtype name, for the types edge models use.
ONNX_TO_NUMPY = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
}
# onnxruntime's type name -> numpy dtype name.
ORT_TO_NUMPY = {
    "tensor(float)": "float32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
}
# OIP v2 datatype -> numpy dtype name: the numeric types a tensor may have on the wire (no BYTES).
OIP_TO_DTYPE = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
DTYPE_TO_OIP = {v: k for k, v in OIP_TO_DTYPE.items()}
