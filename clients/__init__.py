"""loopserve clients: they speak HTTP only and import nothing from engine/ or server/."""
