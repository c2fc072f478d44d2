//! Root images: built with mmdebstrap, cached by recipe hash. (Being written.)
