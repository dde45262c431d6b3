"""Shared fixtures: real registries (testsupport), a real Prefect API, the embedded database."""

import atexit
import os
import shutil
import tempfile

# Prefect reads its settings when first imported: make them hermetic before any test imports it.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="imagegw-test-prefect-")
atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
os.environ.pop("IMAGEGW_MONGODB_URI", None)
os.environ.pop("IMAGEGW_CONFIG", None)
os.environ.pop("IMAGEGW_STATE_DIR", None)
# imagegw pull keeps a migrated Prefect database under the user's cache: the tests keep theirs to themselves.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="imagegw-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

pytest_plugins = ["testsupport.fixtures", "tests.gateway_fixtures", "tests.api_fixtures", "tests.fake_registry",
                  "tests.layer_fixtures", "tests.disk_fixtures", "tests.iaas_fixtures", "tests.user_fixtures"]
