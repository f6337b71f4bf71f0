from fasttrack.nn.vit import (  # noqa: F401  (shared ViT pieces: reference and fused)
    Attention, Block, DropPath, FusedAttention, FusedBlock, FusedMlp, Mlp,
)
from fasttrack.nn.head import CenterPredictor, FusedCenterPredictor  # noqa: F401,E402
from fasttrack.nn.ostrack import (  # noqa: F401,E402  (OSTrack-CE)
    CEBlock, FusedCEBlock, FusedOSTrack, FusedVisionTransformerCE, OSTrack, VisionTransformerCE, build_ostrack,
    ctr_point_mask,
)
from fasttrack.nn.utptrack import (  # noqa: F401,E402  (UTPTrack-O / -S)
    FusedUTPTrackOBlock, FusedUTPTrackSBlock, UTPTrackOBlock, UTPTrackSBlock,
)
from fasttrack.nn.compresstracker import (  # noqa: F401,E402  (CompressTracker)
    CompressTracker, CompressTrackerBackbone, FusedCompressTracker, FusedCompressTrackerBackbone, ReplacementTraining,
    build_compresstracker,
)
from fasttrack.nn.etctrack import (  # noqa: F401,E402  (ETCTrack)
    ETCTrackEncoder, FusedETCTrackEncoder, FusedHIBlock, FusedTokenCompressor, HIBlock, TokenCompressor,
)
from fasttrack.nn.avtrack import (  # noqa: F401,E402  (AVTrack, ABTrack's public sibling)
    AVTrackBlock, AVTrackViT, FusedAVTrackBlock, FusedAVTrackViT,
)
from fasttrack.nn.abtrack import (  # noqa: F401,E402  (ABTrack)
    ABTrackBackbone, BypassBlock, FusedABTrackBackbone, FusedBypassBlock, build_abtrack,
)
