"""The GGUF types quantize.types accepts, and which tool writes each (ftpipe/gguf/export.py writes them).

llama.cpp's converter (convert_hf_to_gguf.py) writes the float types and q8_0 straight from the merged
safetensors; K-quants are made by llama.cpp's own quantizer (llama_model_quantize) from the f16 GGUF, as
llama.cpp's guides do. The numbers are llama.cpp's `llama_ftype` values (include/llama.h).
"""
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANT_FTYPES = {"q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
                  "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}
GGUF_TYPES = (*CONVERTER_TYPES, *K_QUANT_FTYPES)
K_QUANT_SOURCE = "f16"   # the GGUF K-quants are made from: lossless for the float16 merged model
GREEDY_CHECK_TYPE = K_QUANT_SOURCE   # the GGUF whose greedy answers the quantize stage compares with the merged model
