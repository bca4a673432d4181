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

# Architectures of CheXzero's family. "tiny" is the test size; "small" a CPU-trainable demo size;
# "vit-b-32" the published CheXzero model.
ARCHS: dict[str, dict[str, int]] = {
    "tiny": dict(embed_dim=32, vision_width=64, vision_layers=2, patch_size=32, image_size=224, text_width=64, text_layers=2),
    "small": dict(embed_dim=256, vision_width=384, vision_layers=6, patch_size=32, image_size=224, text_width=256, text_layers=4),
    "vit-b-32": dict(embed_dim=512, vision_width=768, vision_layers=12, patch_size=32, image_size=224, text_width=512, text_layers=12),
}
DIM_KEYS = ("embed_dim", "vision_width", "vision_layers", "patch_size", "image_size", "text_width", "text_layers")

# DICOM modalities embed accepts unless told otherwise (--modality): the radiographs CheXzero was
# trained on (computed and digital radiography)
DEFAULT_MODALITIES = frozenset({"CR", "DX"})
