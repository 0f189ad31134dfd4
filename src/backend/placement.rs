//! Where a pool's data lives: directly on the pool directory's filesystem,
//! or, when that filesystem cannot share extents (ext4, tmpfs), inside an
//! xfs image mounted at the pool directory, so that snapshots and clones
//! are O(1) reflinks on every host and never stall a volume's writers for
//! the length of a copy. Decided once at start; an existing image is always
//! mounted again, since the pool's volumes are in it.

use std::path::{Path, PathBuf};

use crate::os::pool::{self, PoolStrategy, Strategy};
use crate::os::pool_image::{self, Mounted, PoolImageError};

/// Whether stowage may keep the pool in an image (`serve --pool-image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PoolImageMode {
    /// Use an xfs image when the pool's filesystem cannot share extents,
    /// the pool holds no data yet and `mkfs.xfs` is installed.
    #[default]
    Auto,
    /// Always use the pool directory's own filesystem (sparse copies on
    /// ext4 and tmpfs). An image made earlier is still mounted.
    Never,
}

/// What [`place`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// The pool is a plain directory on its own filesystem.
    Native,
    /// The pool is the mount point of the xfs image `image`.
    Image { image: PathBuf },
}

impl Placement {
    /// The directory holding the pool image, whose free space also bounds
    /// the pool's (the image is sparse).
    pub fn image_host(&self) -> Option<PathBuf> {
        match self {
            Placement::Native => None,
            Placement::Image { image } => image.parent().map(Path::to_owned),
        }
    }
}

/// Prepares the pool directory `pool` (created if missing, mode 0700) and
/// mounts or makes its image as `mode` allows. Idempotent: a pool image
/// mounted already is left as it is. Reasons to stay native are logged.
/// Returns the probe of a native pool when it had to probe one (so the
/// caller need not probe again).
pub fn place(
    pool: &Path,
    mode: PoolImageMode,
) -> Result<(Placement, Option<PoolStrategy>), PoolImageError> {
    let image = pool_image::image_path(pool);
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |err| PoolImageError::Io { what, path, err }
    };
    std::fs::create_dir_all(pool).map_err(io("create", pool))?;
    if image.is_file() {
        let how = pool_image::mount(pool, &image)?;
        if how == Mounted::Now {
            tracing::info!(pool = %pool.display(), image = %image.display(), "pool image mounted");
        }
        return Ok((Placement::Image { image }, None));
    }
    if mode == PoolImageMode::Never {
        return Ok((Placement::Native, None));
    }
    let probed = match pool::probe(pool) {
        Ok(p) if p.strategy != Strategy::Copy => return Ok((Placement::Native, Some(p))),
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pool = %pool.display(), error = %e, "cannot probe the pool; keeping it as it is");
            return Ok((Placement::Native, None));
        }
    };
    let native = Ok((Placement::Native, Some(probed)));
    if !pool_image::holds_no_data(pool)? {
        tracing::warn!(pool = %pool.display(),
            "the pool's filesystem cannot share extents but the pool already holds volumes; keeping sparse copies (snapshots of staged block volumes stall writers while they copy)");
        return native;
    }
    if !pool_image::mkfs_available() {
        tracing::warn!(pool = %pool.display(),
            "the pool's filesystem cannot share extents and mkfs.xfs is not installed; keeping sparse copies (install xfsprogs for O(1) snapshots)");
        return native;
    }
    let host = image.parent().unwrap_or(Path::new("/"));
    let size = pool_image::default_size(host)?;
    if size < pool_image::MIN_SIZE {
        tracing::warn!(pool = %pool.display(), free = size,
            "too little free space for a pool image; keeping sparse copies");
        return native;
    }
    pool_image::create(&image, size)?;
    pool_image::mount(pool, &image)?;
    tracing::info!(pool = %pool.display(), image = %image.display(), size,
        "the pool's filesystem cannot share extents: keeping the pool in a sparse xfs image with reflinks");
    Ok((Placement::Image { image }, None))
}
