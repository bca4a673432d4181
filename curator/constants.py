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
# The defined terms of DICOM's Modality attribute (PS3.3 C.7.3.1.1.1, current and retired): a
# --modality value outside them is most likely a typo ("XR" for radiographs, which are CR and DX).
DICOM_MODALITIES = frozenset("""
    AR ASMT AU BDUS BI BMD CD CF CP CR CS CT CTPROTOCOL DD DF DG DM DMS DOC DS DX EC ECG EPS ES FA FID FS GM HC HD IO IOL
    IVOCT IVUS KER KO LEN LP LS M3D MA MG MR MS NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP
    RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SC SEG SM SMR SR SRF ST STAIN TEXTUREMAP TG US
    VA VF VL XA XC
""".split())
