"""streams/"""
