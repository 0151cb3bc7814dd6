"""The Hugging Face Hub pipeline: check the remote checkpoints before downloading (preflight),
then download, repair, gate and upload with a model card (push)."""
