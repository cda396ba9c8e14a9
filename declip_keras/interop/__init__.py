"""Other formats in and out: pretrained CLIP and DeCLIP checkpoints into a
`DeCLIP`, and a trained model out as a SavedModel for serving."""
