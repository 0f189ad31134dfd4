//! FUSE mounter daemons for object volumes (filled in by the mounter work).
