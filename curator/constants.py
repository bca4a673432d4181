"""CheXzero's numbers, in one named place.

Every value here is taken from CheXzero's published code (Tiu et al., 2022) and must not be
"improved": the model was trained on images prepared exactly like this.
"""

# Letterbox canvas the archive images are pasted on (CheXzero's ``preprocess(desired_size=320)``).
CANVAS_SIZE = 320
# Model input side (ViT-B/32 at 224x224).
MODEL_INPUT_SIZE = 224
# Pixel statistics of CheXzero's training set, applied to 0..255 values.
PIXEL_MEAN = 101.48761
PIXEL_STD = 83.43944
# Tokenizer context of the text transformer.
CONTEXT_LENGTH = 77

# The default zero-shot template pair ("softmax" method).
POSITIVE_TEMPLATE = "{}"
NEGATIVE_TEMPLATE = "no {}"

# CheXpert's 14 observations, in CheXpert's order.
CHEXPERT_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

# Name of the ensemble "member" in the predictions table (the mean over checkpoints).
ENSEMBLE_MEMBER = "ensemble"
