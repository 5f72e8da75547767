"""moemesh expert node: checkpoint reading, quantization formats, the expert FFN (numpy reference
and native kernels), the gRPC server that hosts experts for a coordinator and its life (mTLS
identity, pairing, mDNS advertisement, the pushed-weight store), and the wire both sides speak.

Never imports from `coordinator` (dependency direction: coordinator -> expert_node -> _native).
"""
