"""``python -m services.bridge``: run the Kubernetes bridge with settings from the environment."""

from libs.service import main
from services.bridge.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
