// Same serialized form as the original VMM's class; test data only.
package eu.rapid.vmm;

public class VmmInfo implements java.io.Serializable {
    private static final long serialVersionUID = -1596628414770206114L;
    long vmmId;
    java.util.List<String> vmImageFreeList;
    SlamInfo slamInfo;
}
