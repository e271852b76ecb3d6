"""Graph passes: one transformation per file, each an onnx_ir pass."""

from qcompile.passes.calibrate import Calibrate
from qcompile.passes.fold_awq_scales import FoldAWQScales
from qcompile.passes.fold_smoothquant_scales import FoldSmoothQuantScales
from qcompile.passes.fuse_attention import FuseGroupQueryAttention
from qcompile.passes.fuse_norm_gains import FuseNormGains
from qcompile.passes.insert_online_hadamard import InsertOnlineHadamard
from qcompile.passes.insert_query_key_hadamard import InsertQueryKeyHadamard
from qcompile.passes.quantize_activations import QuantizeActivations
from qcompile.passes.quantize_embedding import QuantizeEmbedding
from qcompile.passes.quantize_experts import QuantizeExperts
from qcompile.passes.quantize_kv_cache import QuantizeKVCache
from qcompile.passes.quantize_weights_awq import QuantizeWeightsAWQ
from qcompile.passes.quantize_weights_gptq import QuantizeWeightsGPTQ
from qcompile.passes.quantize_weights_rtn import QuantizeWeightsRTN
from qcompile.passes.rotate_residual_stream import RotateResidualStream
from qcompile.passes.rotate_value_output import RotateValueOutput
from qcompile.passes.smooth_rotate_norm_outputs import SmoothRotateNormOutputs
from qcompile.passes.where_possible import WherePossible

__all__ = ["Calibrate", "FoldAWQScales", "FoldSmoothQuantScales", "FuseGroupQueryAttention", "FuseNormGains", "InsertOnlineHadamard", "InsertQueryKeyHadamard", "QuantizeActivations", "QuantizeEmbedding", "QuantizeExperts", "QuantizeKVCache", "QuantizeWeightsAWQ", "QuantizeWeightsGPTQ", "QuantizeWeightsRTN",
           "RotateResidualStream", "RotateValueOutput", "SmoothRotateNormOutputs", "WherePossible"]
