"""moemesh expert node: checkpoint reading, MXFP4 formats, the expert FFN (numpy reference and
native kernels) and, later, the gRPC server that hosts experts for a coordinator.

Never imports from `coordinator` (dependency direction: coordinator -> expert_node -> _native).
"""
