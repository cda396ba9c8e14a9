"""The model: `DeCLIP`, its towers and layers, the loss functions, the
released initialisation and the named presets."""
