"""The names and one-line helps of what a config can name, readable without torch.

``locallearn list`` and ``--help`` must start in a fraction of a second, so they read
these tables instead of importing the registries (models, objectives, heads, engines,
data sets), which import torch. ``tests/test_catalog.py`` checks that every table
equals its registry: registering a new component means adding its line here.
"""

from __future__ import annotations

MODELS: dict[str, str] = {  # locallearn.models.MODELS
    "lstm": "LSTM text classifier: embedding block + one block per LSTM layer",
    "mlp": "MLP: one block per hidden Linear+ReLU layer (input flattened)",
    "resnet110": "CIFAR ResNet-110 (He et al. 2016): stem + 54 basic blocks, 16/32/64 channels",
    "resnet18": "ResNet-18 for CIFAR-size inputs: 3x3 stem + 8 basic blocks",
    "resnet20": "CIFAR ResNet-20 (He et al. 2016): stem + 9 basic blocks, 16/32/64 channels",
    "resnet32": "CIFAR ResNet-32 (He et al. 2016): stem + 15 basic blocks, 16/32/64 channels",
    "resnet56": "CIFAR ResNet-56 (He et al. 2016): stem + 27 basic blocks, 16/32/64 channels",
    "transformer": "Transformer encoder text classifier: embedding + one block per encoder layer",
    "vgg11": "VGG-11 with BatchNorm: 8 conv blocks + linear head",
    "vgg11b": "VGG11B (Nøkland & Eidnes 2019): 9 conv blocks + an FC-1024 block",
    "vgg6a": "VGG6a (Nøkland & Eidnes 2019): 4 conv blocks + FC-1024 head",
    "vgg8": "VGG8 of SCPL (VGG8b convs): 6 conv blocks + FC-2500 head",
    "vgg8b": "VGG8B (Nøkland & Eidnes 2019): 6 conv blocks + an FC-1024 block",
    "vit": "vision transformer: patch embedding + one block per encoder layer",
}

OBJECTIVES: dict[str, str] = {  # locallearn.objectives.OBJECTIVES
    "auglocal": ("AugLocal: CE through fresh copies of uniformly picked later blocks (pyramidal "
                 "depth), then the head"),
    "ce": "cross-entropy of an auxiliary classifier head (DGL / greedy local learning)",
    "infopro": ("InfoPro: reconstruction of the input + CE (variant=softmax) or SupCon "
                "(variant=contrast), weighted per stage"),
    "pred": "PredSim's prediction loss alone: CE of a linear classifier on pooled features",
    "predsim": ("PredSim: (1-beta) CE of a linear classifier on pooled features + beta "
                "similarity-matrix matching (beta=0.99)"),
    "sim": "PredSim's similarity-matching loss alone (the stage does not predict)",
    "simclr": ("self-supervised NT-Xent (SimCLR) on two views, own projector per stage; no "
               "labels (evaluate with `locallearn probe`)"),
    "supcon": ("supervised contrastive loss on a projector (SCPL); the last stage adds a CE "
               "classifier"),
}

HEADS: dict[str, str] = {  # locallearn.objectives.heads.HEAD_KINDS
    "0c1f": "global average pool -> linear",
    "1c2f": "3x3 conv stride 2 (2x channels) -> BN -> ReLU -> avg pool -> FC -> ReLU -> FC",
    "2c2f": "like 1c2f with two convs (the second at stride 1)",
    "linear": "flatten -> linear",
    "mlp": "flatten -> hidden FC layers with ReLU -> linear (option hidden)",
}

ENGINES: dict[str, str] = {  # locallearn.engines.ENGINES
    "backprop": ("end-to-end backpropagation with only the task loss (aux heads on detached "
                 "features)"),
    "local": "sequential local training: each stage updates from its own loss on a detached input",
    "multiexit": "early-exit network: BP of the sum of every stage's loss into the trunk",
    "pipeline": "stages in separate processes, activations sent forward with torch.distributed",
}

DATASETS: dict[str, str] = {  # locallearn.data.DATASET_HELP
    "ag_news": "AG News topics, 120k/7.6k, 4 classes (ag_news_csv folder)",
    "cifar10": "CIFAR-10: 32x32 colour, 10 classes, 50k/10k (python or jpeg tar)",
    "cifar100": "CIFAR-100: 32x32 colour, 100 fine classes, 50k/10k",
    "csv": "any train.csv/test.csv pair with a label column and text columns",
    "dbpedia": "DBpedia ontology, 560k/70k, 14 classes (dbpedia_csv folder)",
    "digits": "scikit-learn's 8x8 handwritten digits: 10 classes, 1437/360, no download",
    "fashion-mnist": "Fashion-MNIST: 28x28 grey, 10 classes, 60k/10k (IDX files)",
    "imagefolder": "images in train/<class>/ and test/<class>/ (path= dir or .tar.gz)",
    "imagenet32": "downsampled ImageNet 32x32: 1000 classes, 1.28M/50k (.npz)",
    "imdb": "IMDB movie reviews, 25k/25k, 2 classes (aclImdb folder or .tar.gz)",
    "kmnist": "Kuzushiji-MNIST: 28x28 grey, 10 classes, 60k/10k (IDX files)",
    "mnist": "MNIST digits: 28x28 grey, 10 classes, 60k/10k (IDX files)",
    "sst2": "Stanford Sentiment Treebank, binary (GLUE SST-2 TSV folder)",
    "stl10": "STL-10 labelled part: 96x96 colour, 10 classes, 5k/8k (binary)",
    "svhn": "SVHN cropped digits: 32x32 colour, 10 classes, 73k/26k (.mat)",
    "synthetic": "learnable random images (class patterns + noise), for tests",
    "textfolder": "one folder per class of .txt files: train/<class>, test/<class>",
    "tinyimagenet": "Tiny ImageNet: 64x64 colour, 200 classes, 100k/10k (val)",
}


def sections() -> list[tuple[str, dict[str, str]]]:
    """The tables as ``locallearn list`` prints them: (title, name -> help)."""
    return [("models", MODELS), ("objectives", OBJECTIVES), ("heads", HEADS),
            ("engines", ENGINES), ("data sets", DATASETS)]
