"""conceptrace's library, in rooms that show the architecture (README "Architecture").

    core/      params, layout, stores, streams, outputs, schema, errors, devices, ranks, CLI plumbing
    kernels/   device kernels shared by methods: red-circle rings, the grid's registration, text encoding, similarity, CAMs
    models/    backbone registry, class mapping, CLIP loading, weights, layer taps, preprocessing
    data/      image folders, segmentation folders, decoding, manifest, prepare, preview
    pipeline/  the shared stages' work: features, clip_images, circles, concepts, similarity
    methods/   one package per method (salf/, fact/, cefam/)
    evaluate/  scoring every method's maps against ground truth; adapters/ plug methods in
    stats/     every concept method's statistics from its concept_stats store, reduced with dask
    metrics/   spatial (NRA, EPG, Hit) and segmentation metrics
    toy/       the toy world, its captions, its models and their training

Import rules (tests/test_dvc_deps.py checks them): core imports nothing of the project; kernels and
metrics import core; models imports core and kernels; data adds models; pipeline adds data and never
imports a method; a method imports core, kernels, models, data, pipeline and metrics, never another
method; evaluate may import everything but toy; stats reads the methods' stores, never their code, and imports
core, data and metrics. toy code is reached only through the model registry
(lib/models/backbones.py), the data it generates (lib/data/prepare.py, preview.py) and the toy stages.
"""
