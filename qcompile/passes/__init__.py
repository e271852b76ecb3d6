"""Graph passes: one transformation per file, each an onnx_ir pass."""

from qcompile.passes.fold_awq_scales import FoldAWQScales
from qcompile.passes.fold_smoothquant_scales import FoldSmoothQuantScales
from qcompile.passes.quantize_activations import QuantizeActivations
from qcompile.passes.quantize_embedding import QuantizeEmbedding
from qcompile.passes.quantize_weights_awq import QuantizeWeightsAWQ
from qcompile.passes.quantize_weights_gptq import QuantizeWeightsGPTQ
from qcompile.passes.quantize_weights_rtn import QuantizeWeightsRTN

__all__ = ["FoldAWQScales", "FoldSmoothQuantScales", "QuantizeActivations", "QuantizeEmbedding", "QuantizeWeightsAWQ", "QuantizeWeightsGPTQ", "QuantizeWeightsRTN"]
