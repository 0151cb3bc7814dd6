"""The repair engine: resolve the inputs, plan the tensors, gather what the method needs (grams),
stream every tensor through it (stream, or the layer-by-layer sequential solve), tune its knob
(autotune), write and publish OUT with its report and card (pipeline, report, card); the same for
a LoRA adapter (adapter) and for the QR merge of two adapters (merge_lora)."""
