"""Running saved model folders: what a folder is, classifiers, batch prediction, and text generation."""
