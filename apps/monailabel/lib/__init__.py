"""The PR-INR MONAI Label app's tasks: the bundle it serves, model versions, inference and fine-tuning."""
