"""producers/"""
