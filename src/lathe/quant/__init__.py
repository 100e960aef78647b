"""`lathe quantize`: the verb (run), its calibration rows and sensitivity scan (calibrate), and
the report that measures float and quantized models side by side (report, measure). The
quantized layers and folders themselves are lathe.model.quant."""
