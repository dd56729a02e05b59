"""FewShotSAM in the browser (``fewshotsam serve``): trame-slicer's views and segment editor plus FewShotSAM.

Needs the ``web`` extra (trame-slicer and the slicer-core it is built for). Imported only by ``fewshotsam serve``.
"""
