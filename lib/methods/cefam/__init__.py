"""CE-FAM (Kuroki & Yamasaki, 2025): concept explanations by fusing a backbone's activation maps.

A translator MLP maps the concatenated, globally average-pooled features of several backbone
layers to a vision-language model's image embedding; a concept's score is the scaled cosine of
that embedding with the concept's text embedding. A concept's region in layer l is a Grad-CAM of
its score over that layer's activation maps; the layer's association score and the concept's
contribution to a class are areas under masking curves over the concept's top channels.

The method's core imports nothing from the rest of the project: `translator` (the MLP, its
default widths, the concept scores and the training loss), `regions` (Grad-CAM weights of every
concept in one Jacobian per image, or through the backbone in batched backward passes, and the
region maps), `association` (layer association scores, best layer and candidates, class
contributions). Around it: `training` (the translator's training loop), `translator_augment`
(the authors' augmented epochs: random crops through the frozen backbone and CLIP), `taps`
(activation maps of several layers in one autograd graph, ViT tokens as patch grids), `explain`
(a batch of images explained, and the extra curves of the figures), `artifacts` (the checkpoint
and the regions store), `figures` (the plots) and `sample_figures` (the explained sample's PNGs),
and the two stages' work, `translator_stage` and `regions_stage`.
"""
