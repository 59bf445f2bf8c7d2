// A class that is not on the importer's whitelist (test data only). Were
// a reader to load it, its readObject would refuse to be read.
package eu.rapid.vmm;

public class Evil implements java.io.Serializable {
    private static final long serialVersionUID = 1L;
    String command = "touch /tmp/rapid-vmm-import-loaded-a-class";

    private void readObject(java.io.ObjectInputStream in)
            throws java.io.IOException, ClassNotFoundException {
        throw new java.io.InvalidObjectException("must never be loaded");
    }
}
