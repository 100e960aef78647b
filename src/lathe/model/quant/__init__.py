"""Quantized models: their layers (modules), which layers a scheme swaps (convert), and the
folder they are saved in and loaded from (store). `lathe quantize` (lathe.quant) makes them."""
